"""pushcore server: the reactor, transports, timers, signals and threads around the sans-IO core."""
