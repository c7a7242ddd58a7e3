"""moeray.protos"""
