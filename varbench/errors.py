"""User-facing errors: one line that names the fix, printed without a traceback by ``run.py``."""


class UserError(Exception):
    """A problem with the user's input or environment (bad name, missing file, bad value)."""


class MissingWeights(UserError):
    def __init__(self, missing: list[tuple[str, str, str]], setting: str = "model.weights_dir"):
        """``missing``: (file, where we looked, where it is published)."""
        self.missing = missing
        parts = [f"{f} (looked in {where}; published at {url})" for f, where, url in missing]
        super().__init__("missing weights: " + "; ".join(parts)
                         + f" -- set VARBENCH_WEIGHTS or {setting} to the folder that holds them")


def did_you_mean(name: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
