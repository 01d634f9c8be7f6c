"""experiments/sgd_dialogue.py with LoRA adapters (rank 8 on q, k, v, o) instead of full
fine-tuning: the pretrained weights stay frozen in runs/shakespeare, only the adapters train.
  python -m gptjax train --config experiments/lora_sgd_dialogue.py --workdir runs/sgd_lora \
      --config.init_from=runs/shakespeare
  python -m gptjax merge --workdir runs/sgd_lora --out runs/sgd_lora_merged   # optional
"""

from gptjax import config as config_lib


def get_config():
  c = config_lib.sibling(__file__, "sgd_dialogue")
  c.stage = "dialogue_lora"
  c.init_from = "runs/shakespeare"
  c.model.lora.update(rank=8, alpha=16.0, dropout=0.05, targets="q,k,v,o")
  c.train.learning_rate = 2e-3  # Adapters start at zero and take a larger step than full FT.
  return c
