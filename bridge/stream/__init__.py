"""The topic: envelope, producer, topics and the embedded broker."""
