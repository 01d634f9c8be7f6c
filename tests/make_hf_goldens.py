"""Writes tests/hf_goldens/: tiny random Hugging Face models of each family gptjax imports,
with their tokenizers and their logits and greedy continuations on fixed ids.

Needs torch and transformers (the test suite needs neither). Regenerate with

  python tests/make_hf_goldens.py

and commit the folder (about 0.5 MB). Each model is d_model 32, two layers, a byte-level BPE
tokenizer of about 300 tokens trained here on a fixed text, weights perturbed away from their
initialisation so every parameter (norm scales and biases too) shows in the logits.
"""

import json
import os
import shutil

import numpy as np
import tokenizers
import torch
import transformers

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_goldens")
TEXT = ("The quick brown fox jumps over the lazy dog. A customer asks about a refund; the "
        "agent answers politely and explains the policy step by step.\n") * 20
IDS = [5, 17, 42, 99, 7, 150, 3, 64, 211, 12]
NEW_TOKENS = 8
EOS = "<|endoftext|>"

FAMILIES = {
    # name: (config class, kwargs); vocab_size filled in from the tokenizer.
    "gpt2": (transformers.GPT2Config, {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
                                           "n_inner": 64}),
    "llama_gqa_untied": (transformers.LlamaConfig, {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 500.0, "tie_word_embeddings": False}),
    "llama_tied": (transformers.LlamaConfig, {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True}),
    # Qwen2 style: q/k/v biases, GQA, tied, embedding rows beyond the tokenizer's tokens.
    "qwen2": (transformers.Qwen2Config, {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 1, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "use_sliding_window": False}),
}
EXTRA_ROWS = {"qwen2": 20}


def make_tokenizer() -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=[EOS],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([TEXT], trainer)
  return tok


def main():
  torch.manual_seed(0)
  shutil.rmtree(OUT, ignore_errors=True)
  tok = make_tokenizer()
  for name, (config_class, kwargs) in FAMILIES.items():
    directory = os.path.join(OUT, name)
    os.makedirs(directory)
    eos_id = tok.token_to_id(EOS)
    config = config_class(vocab_size=tok.get_vocab_size() + EXTRA_ROWS.get(name, 0),
                          bos_token_id=eos_id, eos_token_id=eos_id, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS,
                 "bos_token": None if name == "qwen2" else EOS}, f, indent=2)
    ids = torch.tensor([IDS])
    with torch.no_grad():
      logits = model(ids).logits[0].numpy().astype(np.float32)
      greedy = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=eos_id)[0, len(IDS):].numpy()
    np.savez(os.path.join(directory, "golden.npz"), ids=np.asarray(IDS), logits=logits,
             greedy=greedy)
    for junk in ("generation_config.json",):
      if os.path.exists(os.path.join(directory, junk)):
        os.remove(os.path.join(directory, junk))
    print(name, logits.shape, greedy.tolist())


if __name__ == "__main__":
  main()
