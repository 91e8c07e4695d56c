"""Thin routers: each reads the request, asks the core or `gateway.web.wado`, answers."""
