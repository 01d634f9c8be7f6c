"""Hugging Face interop: import a model directory into a gptjax workdir, export one back.

One module a model family (`gpt2`, `llama`) holds the mapping between Hugging Face tensor
names and gptjax parameters, used both ways; `tokenizer` is the `tokenizers`-library kind of
tokenizer; `importer` and `exporter` are the drivers behind `import-hf` and `export-hf`.
"""
