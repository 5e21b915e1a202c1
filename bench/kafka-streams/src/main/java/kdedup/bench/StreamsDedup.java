package kdedup.bench;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.stream.Collectors;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.kstream.Repartitioned;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.StoreBuilder;
import org.apache.kafka.streams.state.Stores;
import org.apache.kafka.streams.state.WindowStore;
import org.apache.kafka.streams.state.WindowStoreIterator;

/**
 * The side-by-side peer of kdedup (scripts/bench-streams), two commands in one class:
 *
 * <ul>
 *   <li>{@code run}: Kafka Streams' canonical deduplication. Records are re-keyed by their
 *       {@code event-id} header and repartitioned by it (a copy of an event may sit on any input
 *       partition, and a task's state store sees only its own partitions); a processor then keeps
 *       each event ID in a persistent (RocksDB) window store whose retention is the TTL, forwards an
 *       ID it has not seen within the TTL and drops the rest; {@code processing.guarantee =
 *       exactly_once_v2}. A reader of the output (read_committed) counts what is visible there; once
 *       the input's unique events are, it closes Kafka Streams and prints one JSON line: events/s
 *       from the first record consumed to that moment, and the JVM's peak RSS (VmHWM of
 *       /proc/self/status). The processors' own counters cannot say when it is done: a task that
 *       moves between threads (a rebalance) aborts its transaction and processes those records again.
 *   <li>{@code verify}: an independent reader (Kafka's own Java consumer, {@code read_committed}):
 *       the input's event IDs, then each output topic: every input event ID exactly once, nothing
 *       else. Exit status 1 when an output fails.
 *   <li>{@code delete}: deletes the named topics, and Kafka Streams' internal topics of an output
 *       named among them (a run's topics hold its whole dataset on the broker's disk).
 * </ul>
 */
public final class StreamsDedup {
  private static final String HEADER = "event-id";
  private static final String STORE = "event-ids";

  private StreamsDedup() {}

  public static void main(String[] argv) throws Exception {
    if (argv.length == 0) {
      usage();
    }
    Map<String, List<String>> args = parse(argv);
    switch (argv[0]) {
      case "run" -> run(args);
      case "verify" -> System.exit(verify(args) ? 0 : 1);
      case "delete" -> delete(args);
      default -> usage();
    }
  }

  private static void usage() {
    System.err.println(
        "usage: StreamsDedup run --brokers B --input T --output T --expected N --unique N [--ttl-ms MS] [--threads N]\n"
            + "       StreamsDedup verify --brokers B --input T --output T [--output T ...]\n"
            + "       StreamsDedup delete --brokers B --topic T [--topic T ...]");
    System.exit(2);
  }

  // ---------------------------------------------------------------- run

  private static final AtomicLong FIRST_NANOS = new AtomicLong();

  /** Keys a record by its event-id header; a record without one is dropped (and counted). */
  static final class KeyByEventId implements Processor<byte[], byte[], String, byte[]> {
    private ProcessorContext<String, byte[]> context;

    @Override
    public void init(ProcessorContext<String, byte[]> context) {
      this.context = context;
    }

    @Override
    public void process(Record<byte[], byte[]> record) {
      FIRST_NANOS.compareAndSet(0, System.nanoTime());
      Header id = record.headers().lastHeader(HEADER);
      if (id == null) {
        return;
      }
      context.forward(record.withKey(new String(id.value(), StandardCharsets.UTF_8)));
    }
  }

  /** The window-store deduplication (Kafka Streams' documented pattern). */
  static final class Dedup implements Processor<String, byte[], String, byte[]> {
    private final long ttlMs;
    private ProcessorContext<String, byte[]> context;
    private WindowStore<String, Long> seen;

    Dedup(long ttlMs) {
      this.ttlMs = ttlMs;
    }

    @Override
    public void init(ProcessorContext<String, byte[]> context) {
      this.context = context;
      this.seen = context.getStateStore(STORE);
    }

    @Override
    public void process(Record<String, byte[]> record) {
      long at = record.timestamp();
      boolean duplicate;
      try (WindowStoreIterator<Long> earlier = seen.fetch(record.key(), at - ttlMs, at + ttlMs)) {
        duplicate = earlier.hasNext();
      }
      if (!duplicate) {
        seen.put(record.key(), at, at);
        context.forward(record);
      }
    }
  }

  private static void run(Map<String, List<String>> args) throws Exception {
    String brokers = one(args, "brokers");
    String input = one(args, "input");
    String output = one(args, "output");
    long expected = Long.parseLong(one(args, "expected"));
    long unique = Long.parseLong(one(args, "unique"));
    long ttlMs = Long.parseLong(optional(args, "ttl-ms", Long.toString(TimeUnit.HOURS.toMillis(24))));
    int threads =
        Integer.parseInt(
            optional(args, "threads", Integer.toString(Runtime.getRuntime().availableProcessors())));

    int partitions;
    try (Admin admin = Admin.create(Map.of(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, brokers))) {
      partitions =
          admin.describeTopics(List.of(input)).allTopicNames().get().get(input).partitions().size();
      admin.createTopics(List.of(new NewTopic(output, Optional.of(partitions), Optional.empty())))
          .all()
          .get();
    }

    StoreBuilder<WindowStore<String, Long>> store =
        Stores.windowStoreBuilder(
            Stores.persistentWindowStore(
                STORE, Duration.ofMillis(ttlMs), Duration.ofMillis(ttlMs), false),
            Serdes.String(),
            Serdes.Long());
    StreamsBuilder builder = new StreamsBuilder();
    builder.addStateStore(store);
    builder.stream(input, Consumed.with(Serdes.ByteArray(), Serdes.ByteArray()))
        .process(KeyByEventId::new)
        .repartition(Repartitioned.with(Serdes.String(), Serdes.ByteArray()).withName("by-event-id"))
        .process(() -> new Dedup(ttlMs), STORE)
        .to(output, Produced.with(Serdes.String(), Serdes.ByteArray()));

    Path stateDir = Files.createTempDirectory("kdedup-bench-streams");
    Properties props = new Properties();
    props.put(StreamsConfig.APPLICATION_ID_CONFIG, applicationId(output));
    props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
    props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
    props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, threads);
    props.put(StreamsConfig.STATE_DIR_CONFIG, stateDir.toString());
    // The same output compression as kdedup's bench configuration.
    props.put(StreamsConfig.producerPrefix(ProducerConfig.COMPRESSION_TYPE_CONFIG), "lz4");

    long started = System.nanoTime();
    KafkaStreams streams = new KafkaStreams(builder.build(), props);
    streams.setUncaughtExceptionHandler(
        e -> {
          e.printStackTrace();
          return org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler
              .StreamThreadExceptionResponse.SHUTDOWN_APPLICATION;
        });
    AtomicLong visible = new AtomicLong();
    Thread counter = new Thread(() -> read(brokers, output, true, id -> visible.incrementAndGet()));
    counter.setDaemon(true);
    counter.start();
    streams.start();
    long lastReport = System.nanoTime();
    while (visible.get() < unique) {
      KafkaStreams.State state = streams.state();
      if (state == KafkaStreams.State.ERROR || state == KafkaStreams.State.NOT_RUNNING
          || state == KafkaStreams.State.PENDING_ERROR) {
        throw new IllegalStateException("Kafka Streams stopped (" + state + ") with "
            + visible.get() + " of " + unique + " events in its output");
      }
      if (!counter.isAlive()) {
        throw new IllegalStateException("the reader of " + output + " stopped");
      }
      if (System.nanoTime() - lastReport > TimeUnit.SECONDS.toNanos(1)) {
        System.err.printf(Locale.ROOT, "  kafka streams: %d of %d events in its output%n", visible.get(), unique);
        lastReport = System.nanoTime();
      }
      Thread.sleep(5);
    }
    long done = System.nanoTime();
    streams.close(Duration.ofMinutes(2));
    long closed = System.nanoTime();
    streams.cleanUp();
    deleteTree(stateDir);

    long first = FIRST_NANOS.get();
    double secs = (done - first) / 1e9;
    System.out.printf(
        Locale.ROOT,
        "{\"events\":%d,\"unique\":%d,\"threads\":%d,\"partitions\":%d,\"ttl_ms\":%d,"
            + "\"events_per_sec\":%.1f,\"elapsed_secs\":%.3f,\"close_secs\":%.3f,"
            + "\"before_first_record_secs\":%.3f,\"peak_rss_bytes\":%d,\"max_heap_bytes\":%d}%n",
        expected, unique, threads, partitions, ttlMs, expected / secs, secs,
        (closed - done) / 1e9, (first - started) / 1e9, peakRssBytes(),
        Runtime.getRuntime().maxMemory());
  }

  /** VmHWM of this process: its peak resident set so far. */
  private static long peakRssBytes() throws IOException {
    for (String line : Files.readAllLines(Path.of("/proc/self/status"))) {
      if (line.startsWith("VmHWM:")) {
        return Long.parseLong(line.replaceAll("[^0-9]", "")) * 1024;
      }
    }
    return -1;
  }

  private static void deleteTree(Path dir) throws IOException {
    if (!Files.exists(dir)) {
      return;
    }
    try (var paths = Files.walk(dir)) {
      for (Path p : paths.sorted((a, b) -> b.getNameCount() - a.getNameCount()).toList()) {
        Files.deleteIfExists(p);
      }
    }
  }

  private static String applicationId(String output) {
    return "kdedup-bench-streams-" + output;
  }

  private static void delete(Map<String, List<String>> args) throws Exception {
    try (Admin admin = Admin.create(Map.of(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, one(args, "brokers")))) {
      Set<String> named = Set.copyOf(args.getOrDefault("topic", List.of()));
      List<String> doomed =
          admin.listTopics().names().get().stream()
              .filter(t -> named.contains(t)
                  || named.stream().anyMatch(o -> t.startsWith(applicationId(o) + "-")))
              .sorted()
              .collect(Collectors.toList());
      admin.deleteTopics(doomed).all().get();
      System.err.println("deleted " + doomed.size() + " topics: " + String.join(" ", doomed));
    }
  }

  // ---------------------------------------------------------------- verify

  private static boolean verify(Map<String, List<String>> args) {
    String brokers = one(args, "brokers");
    Map<String, Integer> inputIds = new HashMap<>();
    long[] without = {0};
    long inputRecords =
        read(brokers, one(args, "input"), id -> {
          if (id == null) {
            without[0]++;
          } else {
            inputIds.merge(id, 1, Integer::sum);
          }
        });
    System.out.printf(Locale.ROOT, "input %s: %d records, %d distinct event IDs, %d without one%n",
        one(args, "input"), inputRecords, inputIds.size(), without[0]);
    boolean ok = true;
    for (String output : args.getOrDefault("output", List.of())) {
      Map<String, Integer> seen = new HashMap<>();
      long[] unknown = {0};
      long records =
          read(brokers, output, id -> {
            if (id != null && inputIds.containsKey(id)) {
              seen.merge(id, 1, Integer::sum);
            } else {
              unknown[0]++;
            }
          });
      long lost = inputIds.size() - seen.size();
      long repeated = seen.values().stream().filter(n -> n > 1).count();
      boolean good = lost == 0 && repeated == 0 && unknown[0] == 0 && records == inputIds.size();
      ok &= good;
      System.out.printf(Locale.ROOT,
          "output %s: %d records: %d event IDs lost, %d emitted more than once, %d unknown: %s%n",
          output, records, lost, repeated, unknown[0], good ? "ok" : "FAILED");
    }
    return ok;
  }

  /** Reads `topic` from its start to its end (read_committed), handing each record's event ID
   *  (null when it has none) to `onId`; returns the records read. With `follow`, reads on
   *  until the thread ends instead. */
  private static long read(String brokers, String topic, java.util.function.Consumer<String> onId) {
    return read(brokers, topic, false, onId);
  }

  private static long read(
      String brokers, String topic, boolean follow, java.util.function.Consumer<String> onId) {
    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
    props.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
    props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
    props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    props.put(ConsumerConfig.MAX_POLL_RECORDS_CONFIG, 10_000);
    long records = 0;
    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props)) {
      List<TopicPartition> partitions = List.of();
      // A topic created a moment ago may not be in the metadata yet.
      for (long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30);
          partitions.isEmpty() && System.nanoTime() < deadline; ) {
        partitions =
            consumer.partitionsFor(topic, Duration.ofSeconds(30)).stream()
                .map(p -> new TopicPartition(topic, p.partition()))
                .collect(Collectors.toList());
      }
      if (partitions.isEmpty()) {
        throw new IllegalStateException("topic " + topic + " has no partitions (does it exist?)");
      }
      consumer.assign(partitions);
      consumer.seekToBeginning(partitions);
      // read_committed: the end is the last stable offset; every transaction is finished by now.
      Map<TopicPartition, Long> ends = consumer.endOffsets(partitions);
      long idleSince = System.nanoTime();
      while (follow || !atEnd(consumer, ends)) {
        int n = 0;
        for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(200))) {
          Header id = r.headers().lastHeader(HEADER);
          onId.accept(id == null ? null : new String(id.value(), StandardCharsets.UTF_8));
          n++;
        }
        records += n;
        if (n > 0) {
          idleSince = System.nanoTime();
        } else if (!follow && System.nanoTime() - idleSince > TimeUnit.SECONDS.toNanos(30)) {
          throw new IllegalStateException("reading " + topic + ": nothing for 30 s short of its end "
              + ends + " after " + records + " records");
        }
      }
    }
    return records;
  }

  private static boolean atEnd(KafkaConsumer<?, ?> consumer, Map<TopicPartition, Long> ends) {
    for (Map.Entry<TopicPartition, Long> e : ends.entrySet()) {
      if (consumer.position(e.getKey()) < e.getValue()) {
        return false;
      }
    }
    return true;
  }

  // ---------------------------------------------------------------- arguments

  private static Map<String, List<String>> parse(String[] argv) {
    Map<String, List<String>> args = new HashMap<>();
    for (int i = 1; i < argv.length; i++) {
      if (!argv[i].startsWith("--") || i + 1 == argv.length) {
        usage();
      }
      args.computeIfAbsent(argv[i].substring(2), k -> new ArrayList<>()).add(argv[++i]);
    }
    return args;
  }

  private static String one(Map<String, List<String>> args, String name) {
    List<String> values = args.get(name);
    if (values == null || values.size() != 1) {
      System.err.println("--" + name + " is required, once");
      usage();
    }
    return values.get(0);
  }

  private static String optional(Map<String, List<String>> args, String name, String otherwise) {
    return args.containsKey(name) ? one(args, name) : otherwise;
  }
}
