"""Placeholder while this area is being written (replaced in the same change series)."""


def register(panel) -> None:
    pass
