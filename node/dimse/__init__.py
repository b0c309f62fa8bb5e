"""DIMSE services: the storage SCP that receives, and the SCU that echoes and sends."""
