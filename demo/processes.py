"""Kept for code written against it: the process helpers now live in ``demo.services``
(the one launcher of the stack)."""
from .services import free_port, group_alive, port_free, stop_group, udp_port_free

__all__ = ["free_port", "group_alive", "port_free", "stop_group", "udp_port_free"]
