"""moeray.cluster"""
