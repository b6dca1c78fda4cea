package io.meshkit.events;

import java.nio.ByteBuffer;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

/**
 * Produce → consume round trip with the Java client, the yardstick for
 * meshkit's order → notification latency on the same broker.
 *
 * <pre>java -cp ... io.meshkit.events.RoundTrip BOOTSTRAP TOPIC RATE COUNT</pre>
 *
 * Sends COUNT keyed records at RATE a second, spaced evenly (acks=all, no
 * linger), to an existing TOPIC; one consumer, assigned every partition from
 * its end (no group), reads them back. Prints one line of JSON: how many came
 * back and the send → receive latency percentiles in microseconds.
 */
public final class RoundTrip {
    public static void main(String[] args) throws Exception {
        if (args.length != 4) {
            System.err.println("usage: RoundTrip BOOTSTRAP TOPIC RATE COUNT");
            System.exit(2);
        }
        String bootstrap = args[0];
        String topic = args[1];
        int rate = Integer.parseInt(args[2]);
        int count = Integer.parseInt(args[3]);
        if (rate <= 0 || count <= 0) {
            System.err.println("RATE and COUNT must be positive");
            System.exit(2);
        }

        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.LINGER_MS_CONFIG, 0);
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        Properties c = new Properties();
        c.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        c.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
        c.put(ConsumerConfig.FETCH_MAX_WAIT_MS_CONFIG, 100);
        c.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        c.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());

        long[] latencies = new long[count];
        AtomicInteger received = new AtomicInteger();
        AtomicBoolean ready = new AtomicBoolean();
        AtomicBoolean stop = new AtomicBoolean();
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(p);
                KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(c)) {
            List<TopicPartition> partitions = new ArrayList<>();
            for (PartitionInfo info : consumer.partitionsFor(topic, Duration.ofSeconds(10))) {
                partitions.add(new TopicPartition(topic, info.partition()));
            }
            consumer.assign(partitions);
            consumer.seekToEnd(partitions);
            for (TopicPartition tp : partitions) {
                consumer.position(tp); // resolve the end now, before anything is sent
            }
            Thread reader = new Thread(() -> {
                ready.set(true);
                while (!stop.get() && received.get() < count) {
                    for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(100))) {
                        long sent = ByteBuffer.wrap(r.value()).getLong();
                        int i = received.getAndIncrement();
                        if (i < count) {
                            latencies[i] = System.nanoTime() - sent;
                        }
                    }
                }
            });
            reader.start();
            while (!ready.get()) {
                Thread.sleep(1);
            }
            // Connect and fetch metadata before the clock starts.
            producer.partitionsFor(topic);
            long start = System.nanoTime();
            long interval = TimeUnit.SECONDS.toNanos(1) / rate;
            for (int i = 0; i < count; i++) {
                long due = start + i * interval;
                long now;
                while ((now = System.nanoTime()) < due) {
                    long ahead = due - now;
                    if (ahead > 200_000) {
                        Thread.sleep(0, 0);
                        TimeUnit.NANOSECONDS.sleep(ahead - 100_000);
                    }
                }
                byte[] key = ("rt-" + i).getBytes();
                byte[] value = ByteBuffer.allocate(Long.BYTES + 56).putLong(System.nanoTime()).array();
                producer.send(new ProducerRecord<>(topic, key, value));
            }
            producer.flush();
            reader.join(TimeUnit.SECONDS.toMillis(30));
            stop.set(true);
            reader.join();
        }
        int n = Math.min(received.get(), count);
        long[] got = Arrays.copyOf(latencies, n);
        Arrays.sort(got);
        System.out.printf(
                "{\"sent\":%d,\"received\":%d,\"p50_us\":%d,\"p99_us\":%d,\"max_us\":%d}%n",
                count, n, pct(got, 0.50), pct(got, 0.99), n == 0 ? 0 : got[n - 1] / 1000);
    }

    private static long pct(long[] sorted, double q) {
        if (sorted.length == 0) {
            return 0;
        }
        int i = (int) Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1);
        return sorted[Math.max(i, 0)] / 1000;
    }
}
