"""The recommenders layer: each model behind one small Protocol, and the registry that builds and loads
them by name (`registry`)."""
