"""The synthetic cross-view world: city model, renderers, dataset and drive bag."""
