"""The one exception type for user mistakes: bad config, bad data, bad paths."""


class UserError(Exception):
    """Printed by the CLI as one line per problem, with a non-zero exit and no traceback."""


class RunRefused(UserError):
    """A training command refused to start before writing anything into its run dir (the dir is busy, or the
    checkpoint to resume is damaged or does not fit): the run's earlier record (result.json) stays as it was."""


class Diverged(UserError):
    """Training met a non-finite loss or gradient norm and stopped; the last finite checkpoint stays `latest`."""
