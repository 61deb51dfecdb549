"""The Ray engine: client worker actors, the coordinator actor and the round loop driver."""
