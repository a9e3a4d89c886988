"""Code that both sides of the wire share: the device daemon (``agent``) and the cloud side
(``fleet``) import it, and it imports neither of them.

It holds the wire contract (topics, payloads, message ids, time parsing), the MQTT client
factory, the configuration loader and the small web/CLI pieces both sides serve with. Keeping it
here is what lets ``fleet`` avoid importing the device daemon.
"""
