"""The method: difference-in-means directions and their selection, subspaces, weight edits."""
