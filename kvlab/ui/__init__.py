"""Widgets and figures used by the notebooks. They only call the layers below them."""
