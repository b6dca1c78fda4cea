package io.meshkit.spring;

import static org.junit.jupiter.api.Assertions.assertEquals;

import com.google.protobuf.DescriptorProtos.FileDescriptorProto;
import io.meshkit.user.v1.UserProto;
import org.junit.jupiter.api.Test;

class ReflectionJsonNamesTest {
    @Test
    void namesFollowProtoc() {
        assertEquals("createTime", ReflectionJsonNames.jsonName("create_time"));
        assertEquals("nextPageToken", ReflectionJsonNames.jsonName("next_page_token"));
        assertEquals("id", ReflectionJsonNames.jsonName("id"));
        assertEquals("a1B", ReflectionJsonNames.jsonName("a1__b"));
    }

    @Test
    void descriptorsGainJsonNames() throws Exception {
        var file = UserProto.getDescriptor().toProto();
        var filled = FileDescriptorProto.parseFrom(ReflectionJsonNames.withJsonNames(file.toByteString()));
        var user = filled.getMessageTypeList().stream().filter(m -> m.getName().equals("User")).findFirst().orElseThrow();
        assertEquals("createTime", user.getFieldList().get(3).getJsonName());
    }
}
