package io.meshkit.spring;

/**
 * A setting of the config center changed: {@code path} is the dotted setting
 * path ({@code governance.shedding.enabled}), {@code json} its value in force
 * now (the component's over {@code _global}'s), or null when it was removed.
 * With Spring it is published as an application event:
 * {@code @EventListener void on(ConfigChangedEvent change)}. The settings read
 * at start are published too, while the context is still being built, before
 * {@code @EventListener} methods are registered: read those from
 * {@link ConfigCenter#get} / {@link ConfigCenter#entries}.
 */
public record ConfigChangedEvent(String path, String json) {
}
