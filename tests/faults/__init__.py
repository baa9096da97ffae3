"""Fault injection: real l4lb processes under crashes, floods, loss and exhaustion."""
