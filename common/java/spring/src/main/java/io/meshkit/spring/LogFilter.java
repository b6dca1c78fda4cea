package io.meshkit.spring;

import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.Locale;
import java.util.Map;
import java.util.Optional;
import java.util.Set;
import java.util.regex.Pattern;

import ch.qos.logback.classic.Level;
import ch.qos.logback.classic.LoggerContext;
import org.slf4j.LoggerFactory;

/**
 * The config center's {@code log.filter}, a tracing {@code EnvFilter} string
 * as the Rust services read it ({@code info}, {@code info,rskafka=off},
 * {@code warn,io.meshkit=debug}), mapped onto Java loggers: a bare level is
 * the ROOT level, {@code target=level} sets that logger. Targets that are not
 * Java logger names ({@code meshkit_user::db}) and span directives
 * ({@code target[span]=level}) are valid but name nothing here, so they are
 * skipped; a bare target means every level of it ({@code trace}), as in
 * EnvFilter. Anything else is refused.
 *
 * @param root the ROOT level, or null to leave it
 * @param loggers logger name to level (Logback's names: OFF, ERROR, WARN, INFO, DEBUG, TRACE)
 */
public record LogFilter(String root, Map<String, String> loggers) {

    public static final String ROOT = "ROOT";
    private static final Set<String> LEVELS = Set.of("off", "error", "warn", "info", "debug", "trace");
    private static final Pattern RUST_TARGET = Pattern.compile("[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*");
    private static final Pattern JAVA_LOGGER = Pattern.compile("[A-Za-z_$][\\w$]*(\\.[A-Za-z_$][\\w$]*)*");

    /** Parses {@code spec}; the exception's message says what is wrong. */
    public static LogFilter parse(String spec) {
        String root = null;
        Map<String, String> loggers = new LinkedHashMap<>();
        for (String raw : spec.split(",")) {
            String directive = raw.trim();
            if (directive.isEmpty()) {
                continue;
            }
            int eq = directive.lastIndexOf('=');
            String target = eq < 0 ? directive : directive.substring(0, eq).trim();
            String level = eq < 0 ? null : level(directive, directive.substring(eq + 1).trim());
            if (eq < 0 && LEVELS.contains(directive.toLowerCase(Locale.ROOT))) {
                root = directive.toUpperCase(Locale.ROOT);
                continue;
            }
            if (target.contains("[")) {
                // A span filter (target[span{field=value}]=level): nothing to map it to.
                if (!target.endsWith("]")) {
                    throw new IllegalArgumentException("\"" + directive + "\" has an unclosed [");
                }
                continue;
            }
            if (target.isEmpty()) {
                throw new IllegalArgumentException("\"" + directive + "\" names no target");
            }
            if (JAVA_LOGGER.matcher(target).matches()) {
                loggers.put(target, level == null ? "TRACE" : level);
            } else if (!RUST_TARGET.matcher(target).matches()) {
                throw new IllegalArgumentException("\"" + target + "\" is not a target");
            }
        }
        return new LogFilter(root, Map.copyOf(loggers));
    }

    private static String level(String directive, String level) {
        if (!LEVELS.contains(level.toLowerCase(Locale.ROOT))) {
            throw new IllegalArgumentException("\"" + directive + "\": \"" + level
                    + "\" is not a level (off, error, warn, info, debug, trace)");
        }
        return level.toUpperCase(Locale.ROOT);
    }

    /** Reads and sets logger levels: Logback's own, or Spring Boot's LoggingSystem. */
    public interface Levels {
        /** The level configured on {@code logger}, or empty when it inherits. */
        Optional<String> get(String logger);

        /** Sets {@code logger}'s level; empty: inherit again. */
        void set(String logger, Optional<String> level);
    }

    /** Logback's levels (Spring Boot's default logging), for a program without Spring. */
    public static Levels logback() {
        LoggerContext context = (LoggerContext) LoggerFactory.getILoggerFactory();
        return new Levels() {
            @Override
            public Optional<String> get(String logger) {
                return Optional.ofNullable(context.getLogger(logger).getLevel()).map(Level::toString);
            }

            @Override
            public void set(String logger, Optional<String> level) {
                context.getLogger(logger).setLevel(level.map(Level::toLevel).orElse(null));
            }
        };
    }

    /**
     * Applies one filter after another: a logger the new filter no longer names
     * gets back the level it had before the first filter touched it.
     */
    public static final class Applier {
        private final Levels levels;
        private final Map<String, Optional<String>> originals = new HashMap<>();
        private final Set<String> touched = new HashSet<>();

        public Applier(Levels levels) {
            this.levels = levels;
        }

        /** Applies {@code filter}; null restores the process's own levels. */
        public synchronized void apply(LogFilter filter) {
            Map<String, String> wanted = new LinkedHashMap<>();
            if (filter != null) {
                if (filter.root() != null) {
                    wanted.put(ROOT, filter.root());
                }
                wanted.putAll(filter.loggers());
            }
            for (String logger : Set.copyOf(touched)) {
                if (!wanted.containsKey(logger)) {
                    Optional<String> original = originals.get(logger);
                    // ROOT always has a level; the others may inherit again.
                    if (!logger.equals(ROOT) || original.isPresent()) {
                        levels.set(logger, original);
                    }
                    touched.remove(logger);
                }
            }
            wanted.forEach((logger, level) -> {
                originals.computeIfAbsent(logger, levels::get);
                levels.set(logger, Optional.of(level));
                touched.add(logger);
            });
        }
    }
}
