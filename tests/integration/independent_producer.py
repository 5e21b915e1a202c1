"""An independent producer for kdedup's input-side tests: PyPI confluent-kafka,
with its own librdkafka build and every codec, writing JSON events that carry
an `event-id` header, compressed with the codec given, keyed by event ID (so a
duplicate lands on its original's partition).

Usage: independent_producer.py BROKERS TOPIC CODEC COUNT DUPLICATES
Event IDs are CODEC-0 .. CODEC-(COUNT-1); the first DUPLICATES are sent twice.
"""
import json
import sys

from confluent_kafka import Producer

brokers, topic, codec = sys.argv[1], sys.argv[2], sys.argv[3]
count, duplicates = int(sys.argv[4]), int(sys.argv[5])
producer = Producer(
    {
        "bootstrap.servers": brokers,
        "compression.type": codec,
        # Many records per batch, so each batch is compressed as a whole.
        "linger.ms": 50,
        "acks": "all",
    }
)
errors = []


def delivered(err, _msg):
    if err is not None:
        errors.append(str(err))


ids = [f"{codec}-{i}" for i in range(count)]
for event_id in ids + ids[:duplicates]:
    producer.produce(
        topic,
        key=event_id.encode(),
        value=json.dumps({"id": event_id, "codec": codec}).encode(),
        headers=[("event-id", event_id.encode())],
        on_delivery=delivered,
    )
    producer.poll(0)
left = producer.flush(30)
if errors or left:
    print(f"delivery failed: {left} left, errors {errors[:5]}", file=sys.stderr)
    sys.exit(1)
