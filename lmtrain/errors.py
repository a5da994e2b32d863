"""The one exception type for user mistakes: bad config, bad data, bad paths."""


class UserError(Exception):
    """Printed by the CLI as one line per problem, with a non-zero exit and no traceback."""
