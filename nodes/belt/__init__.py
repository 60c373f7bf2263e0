"""Libraries for the nodes that act on the belt (not node kinds): the encoder
track, the valve bar's geometry, the valve datagram and its drivers."""
