package io.meshkit.spring;

/**
 * Who this process is in the mesh: its component ({@code meshkit.component},
 * else spring.application.name) and its instance id, the one in its registry
 * keys and in the {@code x-meshkit-instance} header.
 */
public record MeshkitIdentity(String component, String instanceId) {
}
