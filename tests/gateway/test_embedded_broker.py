"""The embedded default's broker: a consumer never sees a half-written message."""

import threading

from kombu import Connection

TRANSPORT = "config.kombu_filesystem:Transport"


def test_filesystem_broker_delivers_only_whole_messages_while_a_producer_writes(tmp_path):
    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path), "polling_interval": 0}
    payload = {"task": "x" * 20_000}
    count = 300

    def produce():
        with Connection("filesystem://", transport=TRANSPORT, transport_options=options) as conn:
            queue = conn.SimpleQueue("race")
            for i in range(count):
                queue.put({**payload, "i": i})

    producer = threading.Thread(target=produce)
    received = []
    with Connection("filesystem://", transport=TRANSPORT, transport_options=options) as conn:
        queue = conn.SimpleQueue("race")
        producer.start()
        while len(received) < count:
            message = queue.get(timeout=10)
            received.append(message.payload["i"])
            message.ack()
    producer.join()

    assert sorted(received) == list(range(count))
