"""meshkit's own HTTP/1.1 + WebSocket server and the gateway CLIs."""
