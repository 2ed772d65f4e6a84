"""Wire code shared by client, broker and daemon: the message codec (protocol), socket set-up
(sockets) and per-stream pipes (pipes). protocol.md is the normative description."""
