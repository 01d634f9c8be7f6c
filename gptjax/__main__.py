"""`python -m gptjax COMMAND ...`: see gptjax/cli.py."""

from gptjax import cli

if __name__ == "__main__":
  cli.run()
