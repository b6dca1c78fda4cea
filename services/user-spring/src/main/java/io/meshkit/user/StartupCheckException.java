package io.meshkit.user;

/** A setting or the database is not as this service needs it; start-up stops with {@link #action}. */
public class StartupCheckException extends RuntimeException {
    private final String action;

    public StartupCheckException(String message, String action) {
        this(message, action, null);
    }

    public StartupCheckException(String message, String action, Throwable cause) {
        super(message, cause);
        this.action = action;
    }

    public String action() {
        return action;
    }
}
