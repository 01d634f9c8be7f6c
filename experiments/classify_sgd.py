"""Route a customer's first message to its service domain: sequence classification on tfds
schema_guided_dialogue (the first user utterance as text, the domain of the dialogue's first
service as label), from the pretrained stage of experiments/chat_demo.py (tiny_shakespeare
plus schema_guided_dialogue transcripts: the better-matched start) or from scratch with the
same tokenizer:
  python -m gptjax pipeline --config experiments/chat_demo.py --workdir runs/chat_demo
  python -m gptjax train --config experiments/classify_sgd.py --workdir runs/sgd_route \
      --config.init_from=runs/chat_demo/pretrain
  mkdir -p runs/sgd_route_scratch && cp runs/chat_demo/pretrain/tokenizer.model \
      runs/sgd_route_scratch/
  python -m gptjax train --config experiments/classify_sgd.py:scratch \
      --workdir runs/sgd_route_scratch
  python -m gptjax eval --workdir runs/sgd_route --json   # accuracy, macro_f1, confusion

Any run of experiments/shakespeare_pretrain.py's model shape can be the start (init_from).
The dev split holds a domain (Alarm) that train lacks: its dialogues are skipped and counted.
"""

from gptjax import config as config_lib

# The 16 domains of the train split, sorted.
DOMAINS = ("Banks", "Buses", "Calendar", "Events", "Flights", "Homes", "Hotels", "Media",
           "Movies", "Music", "RentalCars", "Restaurants", "RideSharing", "Services", "Travel",
           "Weather")


def get_config(arm: str = "pretrained"):
  c = config_lib.sibling(__file__, "shakespeare_pretrain")
  c.stage = "classify"
  c.data.update(kind="classify", dataset="schema_guided_dialogue", train_split="train",
                eval_split="dev", seq_len=64, eval_batches=0)
  c.classify.update(labels=",".join(DOMAINS), label_field="domain", pool="last")
  c.train.update(steps=600, batch_size=32, learning_rate=1e-3, warmup_steps=30,
                 eval_every=100, checkpoint_every=100, patience=3)
  if arm == "pretrained":
    c.init_from = "runs/chat_demo/pretrain"
  elif arm != "scratch":
    raise ValueError(f"Unknown arm {arm!r} for classify_sgd.py; use no arm (pretrained) or "
                     "classify_sgd.py:scratch.")
  return c
