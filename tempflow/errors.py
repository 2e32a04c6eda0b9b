"""The errors that the command line turns into exit codes, in a module without heavy imports: the CLI names
them before it loads torch, so that a bad recipe is reported at once."""


class RewardError(RuntimeError):
    """A reward raised, returned the wrong number of scores, or returned a non-finite score."""


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite gradients for too many optimizer steps in a row."""
