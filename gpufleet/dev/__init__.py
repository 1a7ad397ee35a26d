"""Tools for rehearsing gpufleet on one machine, such as the local metadata server.

Nothing here runs in a production daemon; ``gpufleet dev`` commands, the tests
and the demo use it.
"""
