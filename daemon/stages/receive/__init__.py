"""Receive: the SCP's handlers (receiver.py) and the extra receiving processes (receivers.py)."""
