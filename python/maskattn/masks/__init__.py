"""Face masks of a thermal-face classifier: geometric and content-based."""

from .content import content_based
from .geometric import adaptive, ellipse, geometric, rectangle

__all__ = ["adaptive", "content_based", "ellipse", "geometric", "rectangle"]
