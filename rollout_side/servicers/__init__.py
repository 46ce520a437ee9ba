"""gRPC servicers: thin adapters from protobuf to the receiver and the engine."""
