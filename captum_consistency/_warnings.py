"""The warnings that captum-consistency issues, one category tree to filter them by."""

from __future__ import annotations

__all__ = ["CaptumConsistencyWarning", "SkippedImageWarning"]


class CaptumConsistencyWarning(UserWarning):
    """Base class of every warning that captum-consistency issues.

    A :class:`UserWarning`, so that it shows by default; filter the library's warnings
    without touching those of PyTorch or Captum through this class.

    Examples::

        >>> import warnings
        >>> warnings.filterwarnings("error", category=CaptumConsistencyWarning)  # e.g. in tests
    """


class SkippedImageWarning(CaptumConsistencyWarning):
    """An image was left out because it could not be decoded (``on_corrupt="skip"``).

    The data sets count such images (``skipped`` of their batches); the warning names the file.

    Examples::

        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", SkippedImageWarning)  # counted, not printed
        ...     stats = train_one_epoch(...)
    """
