package io.meshkit.events;

import io.meshkit.notification.v1.OrderCreated;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeader;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

/**
 * A Java service on meshkit's event topics, with nothing but kafka-clients
 * and the classes generated from {@code proto/}, following the header
 * contract of docs/EVENTS.md.
 *
 * <pre>
 * java -cp ... io.meshkit.events.Peer consume BOOTSTRAP TOPIC GROUP COUNT TIMEOUT_SECONDS
 * java -cp ... io.meshkit.events.Peer produce BOOTSTRAP TOPIC ORDER_ID USER_ID COPIES
 * </pre>
 *
 * {@code consume} joins GROUP, reads the topic from the start until COUNT
 * {@code OrderCreated} events have come (or the time is up; COUNT 0 reads
 * until then and succeeds with whatever came) and prints one
 * JSON line per event: its fields, decoded from the shared protos, and its
 * headers. {@code produce} writes one {@code OrderCreated} keyed by ORDER_ID,
 * COPIES times with the same {@code event-id} (a producer retrying), with the
 * default partitioner, and prints one JSON line per copy with its partition
 * and offset.
 */
public final class Peer {
    static final String SCHEMA = "meshkit.notification.v1.OrderCreated";

    public static void main(String[] args) throws Exception {
        if (args.length == 6 && args[0].equals("consume")) {
            consume(args[1], args[2], args[3], Integer.parseInt(args[4]), Integer.parseInt(args[5]));
        } else if (args.length == 6 && args[0].equals("produce")) {
            produce(args[1], args[2], args[3], args[4], Integer.parseInt(args[5]));
        } else {
            System.err.println("usage: Peer consume BOOTSTRAP TOPIC GROUP COUNT TIMEOUT_SECONDS");
            System.err.println("       Peer produce BOOTSTRAP TOPIC ORDER_ID USER_ID COPIES");
            System.exit(2);
        }
    }

    static String header(ConsumerRecord<byte[], byte[]> r, String name) {
        Header h = r.headers().lastHeader(name);
        return h == null ? "" : new String(h.value(), StandardCharsets.UTF_8);
    }

    static String json(String s) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }

    static void consume(String bootstrap, String topic, String group, int count, int timeoutSeconds)
            throws Exception {
        Properties c = new Properties();
        c.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        c.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        c.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        c.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, true);
        c.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        c.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        long deadline = System.nanoTime() + Duration.ofSeconds(timeoutSeconds).toNanos();
        int seen = 0;
        try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(c)) {
            consumer.subscribe(List.of(topic));
            while ((count <= 0 || seen < count) && System.nanoTime() < deadline) {
                for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(200))) {
                    if (!header(r, "schema").equals(SCHEMA)) {
                        continue;
                    }
                    OrderCreated event = OrderCreated.parseFrom(r.value());
                    String key = r.key() == null ? "" : new String(r.key(), StandardCharsets.UTF_8);
                    System.out.println("{\"order_id\":" + json(event.getOrderId())
                            + ",\"user_id\":" + json(event.getUserId())
                            + ",\"total_quantity\":" + event.getTotalQuantity()
                            + ",\"event_id\":" + json(event.getEventId())
                            + ",\"key\":" + json(key)
                            + ",\"header_event_id\":" + json(header(r, "event-id"))
                            + ",\"traceparent\":" + json(header(r, "traceparent"))
                            + ",\"partition\":" + r.partition() + "}");
                    seen++;
                }
            }
            consumer.commitSync();
        }
        System.out.flush();
        if (count > 0 && seen < count) {
            System.err.println("only " + seen + " of " + count + " OrderCreated events within " + timeoutSeconds + " s");
            System.exit(1);
        }
    }

    static void produce(String bootstrap, String topic, String orderId, String userId, int copies) throws Exception {
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        String eventId = UUID.randomUUID().toString();
        long now = System.currentTimeMillis();
        OrderCreated event = OrderCreated.newBuilder()
                .setEventId(eventId)
                .setOrderId(orderId)
                .setUserId(userId)
                .setTotalQuantity(1)
                .build();
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(p)) {
            for (int i = 0; i < copies; i++) {
                List<Header> headers = List.of(
                        new RecordHeader("event-id", eventId.getBytes(StandardCharsets.UTF_8)),
                        new RecordHeader("schema", SCHEMA.getBytes(StandardCharsets.UTF_8)),
                        new RecordHeader("content-type", "application/x-protobuf".getBytes(StandardCharsets.UTF_8)));
                ProducerRecord<byte[], byte[]> record = new ProducerRecord<>(
                        topic, null, now, orderId.getBytes(StandardCharsets.UTF_8), event.toByteArray(), headers);
                RecordMetadata meta = producer.send(record).get();
                System.out.println("{\"event_id\":" + json(eventId) + ",\"partition\":" + meta.partition()
                        + ",\"offset\":" + meta.offset() + "}");
            }
        }
    }
}
