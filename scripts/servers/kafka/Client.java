// An independent Kafka client for the test bed, run by Java's single-file launcher on the
// classpath that pom.xml resolves (Kafka's own Java client, not librdkafka):
//   ready BOOTSTRAP SECONDS        exit 0 once the broker answers a metadata request
//   transactions BOOTSTRAP TOPIC ID_PREFIX N ABORT_EVERY
//                                  N transactions of one record each (event ID header and key
//                                  ID_PREFIX-i); every ABORT_EVERY-th is aborted; prints the
//                                  committed IDs, one a line
//   committed BOOTSTRAP GROUP TOPIC
//                                  prints "PARTITION COMMITTED END" per partition (end: the
//                                  broker's high watermark)
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.*;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.*;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class Client {
    public static void main(String[] args) throws Exception {
        switch (args[0]) {
            case "ready" -> System.exit(ready(args[1], Integer.parseInt(args[2])));
            case "transactions" -> transactions(args[1], args[2], args[3], Integer.parseInt(args[4]), Integer.parseInt(args[5]));
            case "committed" -> committed(args[1], args[2], args[3]);
            default -> { System.err.println("unknown command " + args[0]); System.exit(2); }
        }
    }

    static Properties admin(String bootstrap) {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "2000");
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
        return p;
    }

    static int ready(String bootstrap, int seconds) throws Exception {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(seconds);
        try (Admin admin = Admin.create(admin(bootstrap))) {
            while (System.nanoTime() < deadline) {
                try {
                    int brokers = admin.describeCluster().nodes().get(3, TimeUnit.SECONDS).size();
                    if (brokers > 0) return 0;
                } catch (Exception e) {
                    Thread.sleep(200);
                }
            }
        }
        return 1;
    }

    static void transactions(String bootstrap, String topic, String prefix, int n, int abortEvery) throws Exception {
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, prefix + "-txn");
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        try (Producer<byte[], byte[]> producer = new KafkaProducer<>(p)) {
            producer.initTransactions();
            for (int i = 0; i < n; i++) {
                String id = prefix + "-" + i;
                byte[] bytes = id.getBytes(StandardCharsets.UTF_8);
                producer.beginTransaction();
                ProducerRecord<byte[], byte[]> r = new ProducerRecord<>(topic, bytes,
                    ("{\"id\":\"" + id + "\"}").getBytes(StandardCharsets.UTF_8));
                r.headers().add("event-id", bytes);
                producer.send(r).get();
                if (abortEvery > 0 && i % abortEvery == abortEvery - 1) {
                    producer.abortTransaction();
                } else {
                    producer.commitTransaction();
                    System.out.println(id);
                }
            }
        }
    }

    static void committed(String bootstrap, String group, String topic) throws Exception {
        try (Admin admin = Admin.create(admin(bootstrap))) {
            Map<TopicPartition, OffsetAndMetadata> committed =
                admin.listConsumerGroupOffsets(group).partitionsToOffsetAndMetadata().get();
            int partitions = admin.describeTopics(List.of(topic)).allTopicNames().get().get(topic).partitions().size();
            Map<TopicPartition, OffsetSpec> want = new HashMap<>();
            for (int i = 0; i < partitions; i++) want.put(new TopicPartition(topic, i), OffsetSpec.latest());
            Map<TopicPartition, ListOffsetsResult.ListOffsetsResultInfo> ends =
                admin.listOffsets(want, new ListOffsetsOptions(org.apache.kafka.common.IsolationLevel.READ_UNCOMMITTED)).all().get();
            for (int i = 0; i < partitions; i++) {
                TopicPartition tp = new TopicPartition(topic, i);
                OffsetAndMetadata c = committed.get(tp);
                System.out.println(i + " " + (c == null ? -1 : c.offset()) + " " + ends.get(tp).offset());
            }
        }
    }
}
