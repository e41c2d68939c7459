"""What the task derives from an entry: mood, word count, top words, questions asked.

The original app asked a language model; ``INSIGHTS_MODEL_SECONDS`` keeps that call's
duration (a worker killed mid-task is most likely killed here) without the model.
"""

import re
import time
from collections import Counter
from typing import Any

from django.conf import settings

POSITIVE_WORDS = frozenset(
    {"calm", "enjoy", "fun", "glad", "good", "grateful", "great", "happy", "love", "proud"}
)
NEGATIVE_WORDS = frozenset({"angry", "anxious", "bad", "sad", "stressful", "tired", "worried"})
STOP_WORDS = frozenset({"a", "an", "and", "the", "to", "of", "in", "on", "for", "is", "was"})


def derive_insights(body: str) -> dict[str, Any]:
    time.sleep(settings.INSIGHTS_MODEL_SECONDS)
    words = re.findall(r"[a-z']+", body.lower())
    positive = sum(word in POSITIVE_WORDS for word in words)
    negative = sum(word in NEGATIVE_WORDS for word in words)
    mood = "positive" if positive > negative else "negative" if negative > positive else "neutral"
    top = Counter(word for word in words if word not in STOP_WORDS and len(word) > 2)
    return {
        "word_count": len(words),
        "mood": mood,
        "top_words": [word for word, _ in top.most_common(3)],
        "questions": body.count("?"),
    }
