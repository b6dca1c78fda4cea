package io.meshkit.spring;

import java.util.Map;
import java.util.TreeMap;

import com.fasterxml.jackson.annotation.JsonPropertyOrder;

import tools.jackson.databind.json.JsonMapper;

/**
 * One registered instance, as stored under its key:
 * {@code {"addr":"host:port","zone":"…","weight":100,"version":"…","metadata":{…}}}.
 * Metadata meshkit reads: {@code component} and {@code admin} (host:port of /metrics).
 */
@JsonPropertyOrder({"addr", "zone", "weight", "version", "metadata"})
public record Instance(String addr, String zone, int weight, String version, Map<String, String> metadata) {

    private static final JsonMapper JSON = JsonMapper.builder().build();

    public Instance {
        metadata = new TreeMap<>(metadata);
    }

    public String toJson() {
        return JSON.writeValueAsString(this);
    }
}
