"""The shapes world: a small text-to-image model shipped in weights/, its data, judge and metrics, and the demo
and evaluation that run every method on it. It imports the library (erasers/); the library never imports it."""
