"""moderator: a content-moderation stream processor (Kafka image events -> CLIP -> policy decisions)."""

__version__ = "0.1.0"
