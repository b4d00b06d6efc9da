"""The transformer: configuration, parameters, the scanned forward with interventions, generation, batching,
sharding."""
