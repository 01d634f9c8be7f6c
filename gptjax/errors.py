"""The one exception type for problems a user can fix.

A `UserError` is bad input (a config value, a flag, a path, a dataset, a record): the command
line prints its message as one line and exits with status 1. Its message says what was wrong,
what was expected and what to do. Any other exception is a bug in gptjax and keeps its
traceback. It subclasses ValueError so callers that catch bad values keep working.
"""


class UserError(ValueError):
  """Input a user can correct; the message is one actionable line."""
