"""Mirrors the PythonQt ``qt`` module: the QTimer the Widget polls the worker with."""


class QTimer:
    def __init__(self):
        self.interval, self.active, self.slots = 0, False, {}

    def setInterval(self, milliseconds):
        self.interval = milliseconds

    def connect(self, signal, slot):
        self.slots[signal] = slot

    def start(self):
        self.active = True

    def stop(self):
        self.active = False
