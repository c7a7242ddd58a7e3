"""moeray.workers"""
