"""Input widgets that refuse a bad value by name: which widget, what it offers, what came.

ipywidgets answers a value outside a dropdown's options with `TraitError: Invalid selection:
value not found`, which names neither the widget nor its options, and an IntText quietly
turns 2.5 into 2. The widgets here take a `name` (how a message calls the widget, e.g.
"MemoryCalculator gpu") and raise WidgetValueError instead:

    MemoryCalculator gpu must be one of 'A100-40GB', 'H100-80GB', ..., 'custom'; got 'bogus'
    MemoryCalculator custom layers must be a whole number, got 2.5

WidgetValueError is both the TraitError ipywidgets raises and the ValueError kvlab's argument
checks raise (kvlab.checks), so code that catches either still works. The check runs when the
widget is built (a bad constructor argument of an app) and whenever code sets `.value` later;
in the browser a learner can only pick what is offered.

    from kvlab.ui.widgets import Dropdown
    gpu = Dropdown(options=["H100-80GB", "A100-80GB"], value="H100-80GB", name="MemoryCalculator gpu")
"""

from __future__ import annotations

import numbers

import ipywidgets as W
import numpy as np
import traitlets
from traitlets import TraitError, validate

from kvlab import checks


class WidgetValueError(TraitError, ValueError):
    """A widget was given a value it cannot hold (a TraitError for ipywidgets, a ValueError for kvlab)."""


def _options(widget) -> str:
    return ", ".join(checks.brief(v) for v in widget._options_values)


def _checked_selection(widget_class: type) -> type:
    """widget_class (an ipywidgets selection) whose refusal names the widget and lists its options."""

    class Checked(widget_class):
        def __init__(self, *args, name: str, **kwargs):
            self.kvlab_name = name                # set first: the constructor validates `value`
            super().__init__(*args, **kwargs)

        @validate("value")
        def _validate_value(self, proposal):
            try:
                return super()._validate_value(proposal)
            except TraitError:
                if isinstance(proposal.value, (tuple, list)):     # SelectMultiple: a tuple of options
                    unknown = [v for v in proposal.value if v not in self._options_values]
                    raise WidgetValueError(f"{self.kvlab_name} must be a selection of {_options(self)}; got "
                                           f"{checks.brief(tuple(proposal.value))}, where "
                                           f"{', '.join(checks.brief(v) for v in unknown)} is not one") from None
                raise WidgetValueError(f"{self.kvlab_name} must be one of {_options(self)}; got "
                                       f"{checks.brief(proposal.value)}") from None

    Checked.__name__ = Checked.__qualname__ = widget_class.__name__
    Checked.__doc__ = f"ipywidgets.{widget_class.__name__} that refuses a value outside its options by name."
    return Checked


Dropdown = _checked_selection(W.Dropdown)
SelectionSlider = _checked_selection(W.SelectionSlider)
SelectMultiple = _checked_selection(W.SelectMultiple)
ToggleButtons = _checked_selection(W.ToggleButtons)


class _WholeNumber(traitlets.CInt):
    """An int trait that takes whole numbers only: 2.0 and numpy ints pass, 2.5 and True do not."""

    def validate(self, obj, value):
        fraction = isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) \
            and not float(value).is_integer()
        if isinstance(value, (bool, np.bool_)) or fraction or not isinstance(value, numbers.Real):
            raise WidgetValueError(f"{getattr(obj, 'kvlab_name', type(obj).__name__)} must be a whole number, "
                                   f"got {checks.shown(value)}")
        return super().validate(obj, value)


class IntText(W.IntText):
    """ipywidgets.IntText that refuses a fraction (2.5) by name instead of truncating it to 2."""

    value = _WholeNumber(0, help="Int value").tag(sync=True)

    def __init__(self, *args, name: str, **kwargs):
        self.kvlab_name = name
        super().__init__(*args, **kwargs)
