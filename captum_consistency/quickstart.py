"""Former home of the quickstart's pieces, which now live where they belong:
:class:`~captum_consistency.models.SmallResNet`, :mod:`captum_consistency.report` and
:mod:`captum_consistency.viz`. Import them from there."""

from captum_consistency.models import SmallResNet  # noqa: F401
from captum_consistency.report import summarize_seeds, table1_markdown  # noqa: F401
from captum_consistency.viz import gradcam_panel, lambda_sweep_plot, panel_size  # noqa: F401
