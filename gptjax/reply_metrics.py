"""Scores of generated replies against reference replies: pure functions over strings.

Per reply (`turn_scores`) and over a set of replies (`corpus_scores`):

  bleu        sacrebleu BLEU, 0-100; orders with no n-gram in a short reply are left out
              ("effective order"), so a reply equal to its reference scores 100
  chrf        sacrebleu chrF (character n-gram F-score), 0-100
  rouge_l     ROUGE-L F-measure (longest common subsequence of words, rouge-score), 0-100
  distinct_1, distinct_2   distinct word uni/bigrams over all replies / their count (Li et
              al. 2016): low means the model says the same things to everyone
  reply_words, reference_words, length_ratio   mean lengths in words, and their ratio
  ended_rate  share of replies that ended at the end token (not cut by the length limit)
  degenerate_rate   share of replies that are empty or repeat a word n-gram `repeats` times

The corpus BLEU and chrF pool n-gram counts over all replies (sacrebleu's corpus scores),
which is the usual and less noisy figure; `turn_scores` gives the per-reply values.
"""

from collections import Counter
from collections.abc import Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

DEGENERATE_NGRAM = 3  # Word n-gram size of the repetition test.
DEGENERATE_REPEATS = 3  # An n-gram occurring this often makes a reply degenerate.

_BLEU = sacrebleu.metrics.BLEU(effective_order=True)
_CHRF = sacrebleu.metrics.CHRF()
_ROUGE = rouge_scorer.RougeScorer(["rougeL"])


def words(text: str) -> list[str]:
  return text.split()


def ngrams(items: Sequence[str], n: int) -> list[tuple[str, ...]]:
  return [tuple(items[i:i + n]) for i in range(len(items) - n + 1)]


def is_degenerate(reply: str, n: int = DEGENERATE_NGRAM, repeats: int = DEGENERATE_REPEATS) -> bool:
  """Empty, or some word n-gram occurs `repeats` times or more ("the the the the the")."""
  grams = Counter(ngrams(words(reply), n))
  return not reply.strip() or (bool(grams) and max(grams.values()) >= repeats)


def rouge_l(reply: str, reference: str) -> float:
  return 100.0 * _ROUGE.score(reference, reply)["rougeL"].fmeasure


def turn_scores(reply: str, reference: str) -> dict:
  """The scores of one reply against its reference."""
  return {"bleu": _BLEU.sentence_score(reply, [reference]).score,
          "chrf": _CHRF.sentence_score(reply, [reference]).score,
          "rouge_l": rouge_l(reply, reference),
          "reply_words": len(words(reply)), "reference_words": len(words(reference)),
          "degenerate": is_degenerate(reply)}


def distinct(replies: Sequence[str], n: int) -> float:
  """Distinct word n-grams over all replies / all their n-grams (0 when there are none)."""
  grams = [g for r in replies for g in ngrams(words(r), n)]
  return len(set(grams)) / len(grams) if grams else 0.0


def corpus_scores(replies: Sequence[str], references: Sequence[str],
                  ended: Sequence[bool]) -> dict:
  """The scores of a set of replies (see the module docstring); `ended[i]` says whether
  reply i stopped at the end token."""
  if not (len(replies) == len(references) == len(ended)) or not replies:
    raise ValueError(f"Expected as many replies ({len(replies)}) as references "
                     f"({len(references)}) and end flags ({len(ended)}), at least one.")
  reply_words = np.mean([len(words(r)) for r in replies])
  reference_words = np.mean([len(words(r)) for r in references])
  return {"turns": len(replies),
          "bleu": _BLEU.corpus_score(list(replies), [list(references)]).score,
          "chrf": _CHRF.corpus_score(list(replies), [list(references)]).score,
          "rouge_l": float(np.mean([rouge_l(r, t) for r, t in zip(replies, references)])),
          "distinct_1": distinct(replies, 1), "distinct_2": distinct(replies, 2),
          "reply_words": float(reply_words), "reference_words": float(reference_words),
          "length_ratio": float(reply_words / reference_words) if reference_words else 0.0,
          "ended_rate": float(np.mean(ended)),
          "degenerate_rate": float(np.mean([is_degenerate(r) for r in replies]))}
