"""The demo: an example upstream behind a fault-injecting proxy, and a traffic driver."""
