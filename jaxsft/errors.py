"""Errors a user can fix.

`UserError` is what jaxsft raises for a problem in what the user gave it (a config value, a
path, a data record, a tokenizer folder, a work directory in use): its message names the problem,
where it is and the fix, in one line. The CLI prints that line and exits with `EXIT_USER_ERROR`
(2), without a traceback unless `--debug`. Any other exception is a bug in jaxsft and keeps its
traceback. It subclasses `ValueError` so that library callers catching `ValueError` still do.
"""

EXIT_USER_ERROR = 2


class UserError(ValueError):
  """A problem in the user's input; the message says what, where and how to fix it."""
